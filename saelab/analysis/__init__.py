"""Analysis: evaluation metrics, the one streaming feature pass, the feature store (the only SQL)
and the view models every renderer reads."""

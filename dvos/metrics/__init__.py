"""J&F (region similarity and boundary accuracy) identical to the official DAVIS toolkit."""

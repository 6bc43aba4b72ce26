"""Loading models and serving versions: the model factory, the policy holder, the decode engine, sampling."""

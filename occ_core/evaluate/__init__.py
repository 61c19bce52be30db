"""Evaluation: the method's protocol on a checkpoint (``infer``) and its scores (``score``)."""

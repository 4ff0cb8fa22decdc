"""MHA -> GQA/MQA: pooling (one tensor at a time) and the calibrated methods (a layer at a time)."""

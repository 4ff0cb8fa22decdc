"""MHA/GQA -> MLA: the DeepSeek-V3 and attnconv formats, their factorisations and calibration."""

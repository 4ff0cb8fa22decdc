"""Everything that reaches into transformers' internals, in one place (attnconv/kernels/ stays transformers-free).

Each patch is switched on for one block of work and undone after it, so one command cannot change another's
behaviour in the same process:
- attention.py: registers attnconv's attention functions with transformers under distinct names, when used;
- decode_cache.py / decode_attention.py: the preallocated KV cache and the attention of attnconv's decode loop
  ("attnconv_decode");
- deepseek_v3.py / attnconv_mla.py: MLA checkpoints (DeepSeek-V3's format, attnconv's own) in the decode loop with a
  latent cache and absorbed one-token steps;
- decode_linear.py: CPU decode Linear layers through the few-row kernel or packed oneDNN weights;
- training_attention.py: causal attention in query blocks for CPU training ("attnconv_train_cpu");
- fused_loss.py: the output layer computing the loss without the full logits;
- liger.py: Liger-Kernel's RMSNorm/RoPE/SwiGLU on CUDA.
"""

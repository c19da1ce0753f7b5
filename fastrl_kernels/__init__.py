"""fastrl_kernels: fused loss kernels for RL fine-tuning."""

"""Export: the adapter folder and its loaders (adapter), the single-file LoRA for ComfyUI / A1111 (kohya),
the MLflow pyfunc model (pyfunc_model)."""

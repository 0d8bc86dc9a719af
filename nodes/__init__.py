"""ComfyUI nodes (V3 schema). Each layer's nodes live in one module; a module whose
dependencies are missing is replaced by nodes that explain what to install."""

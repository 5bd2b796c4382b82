"""Small pieces shared by the memory, model, engine and node layers (no ROS, no model math):
crash-safe files and CUDA graph capture."""

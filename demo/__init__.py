"""Gradio demo for BlindNet: ``python -m demo --checkpoint model.safetensors`` (see ``demo.app.build_demo``)."""

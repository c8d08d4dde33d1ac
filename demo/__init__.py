"""Gradio demo for BlindNet: ``python -m blindnet.demo --checkpoint model.safetensors`` (see ``demo.app.build_demo``)."""

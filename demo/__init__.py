"""ISFE Gradio demo: image search over a gallery (`python -m demo --model ... --gallery ...`)."""

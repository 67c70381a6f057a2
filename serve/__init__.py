"""Serving exported models: `Predictor` (serve/predictor.py), the web UI and JSON API
(`python -m serve MODEL`, serve/app.py) and the command line (`python -m serve.predict`).

Importing `serve` loads nothing heavy; each submodule imports torch, fastai or Gradio when used.
"""

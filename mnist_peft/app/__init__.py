"""The Gradio web app: drawing preprocessing, one module per tab, the page assembly."""

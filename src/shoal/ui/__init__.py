"""The web UI: static HTML/CSS/JS served by the gateway at /ui (GPUs, Models, Playground)."""

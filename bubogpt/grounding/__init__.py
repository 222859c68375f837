"""Visual grounding: image tagging (RAM), then boxes and masks for the tags."""

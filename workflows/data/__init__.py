"""Data workflows: readers of the original corpus formats (`readers`) and the Ray Data preparation."""

import re
from pathlib import Path

FORBIDDEN = re.compile(r"^\s*(import|from)\s+(ray|mlflow|torch\.distributed)\b", re.MULTILINE)


def test_model_library_imports_no_ray_mlflow_or_distributed():
    library = Path(__file__).resolve().parents[1] / "bubogpt"
    offenders = [str(p) for p in library.rglob("*.py") if FORBIDDEN.search(p.read_text())]
    assert offenders == []

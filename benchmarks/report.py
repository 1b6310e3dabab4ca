"""How every benchmark reports: an aligned table on stdout, optionally one JSON line appended."""
import json
from typing import Optional


def report(result: dict, json_path: Optional[str] = None) -> None:
  width = max(map(len, result))
  for k, v in result.items():
    print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
  if json_path:
    with open(json_path, "a") as f:
      f.write(json.dumps(result) + "\n")

"""What every benchmark records beside its figures: the machine and the command that printed them."""
from __future__ import annotations

import json
import os
import platform
import sys
import time


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu_cores": os.cpu_count(), "memory_gib": round(mem, 1), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(),
            "load_average_1min_at_end": os.getloadavg()[0]}  # other jobs on the cores skew throughput


def write_result(name: str, rows: list[dict], path: str | None, **extra) -> dict:
    """rows: [{"metric": str, "value": float|str, "unit": str}, ...]; printed, and saved as JSON when path is given."""
    result = {"benchmark": name, "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "rows": rows, **extra}
    for r in rows:
        value = f"{r['value']:.4g}" if isinstance(r["value"], float) else r["value"]
        print(f"{name:<12} {r['metric']:<48} {value} {r.get('unit', '')}")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result

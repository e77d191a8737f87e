"""What every benchmark table says about itself, so that anyone can re-run it and knows what it measured."""
from __future__ import annotations

import os
import platform
import sys
from datetime import date


def machine() -> str:
    """CPU, cores, GPU and the library versions that set the speed."""
    import cv2
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__},"
            f" OpenCV {cv2.__version__}")


def header(title: str, data: str) -> str:
    """A markdown title, then the command as run, the data, the machine and the date."""
    return (f"# {title}\n\nCommand: `{' '.join(['python', *sys.argv])}`  \nData: {data}  \nMachine: {machine()}  \n"
            f"Date: {date.today().isoformat()}\n")

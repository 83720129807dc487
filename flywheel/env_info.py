"""`flywheel env`: the versions and devices flywheel sees, for bug reports."""

from __future__ import annotations

import platform


def main(argv: list[str]) -> int:
    import torch
    import transformers

    import flywheel

    print(f"flywheel      {flywheel.__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    print(f"cpu threads   {torch.get_num_threads()}")
    cuda = torch.cuda.is_available()
    print(f"cuda          {torch.version.cuda if cuda else 'not available'}")
    for index in range(torch.cuda.device_count() if cuda else 0):
        print(f"  cuda:{index}      {torch.cuda.get_device_name(index)}")
    return 0

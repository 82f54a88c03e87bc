"""``import torch_npu`` in any process started under ``emu.npu.run`` (it puts this folder on
PYTHONPATH, so subprocesses, e.g. vllm's model inspection, get mc2-emu's torch_npu too)."""
import emu.npu as _emu_npu

_emu_npu.install()          # replaces sys.modules["torch_npu"] with mc2-emu's module

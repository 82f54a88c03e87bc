"""Atlas A3 (Ascend910_93): the operator's checks and its dispatch / combine phases."""

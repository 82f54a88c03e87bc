"""Atlas A2 (Ascend910B): its checks, the fullmesh path and the two-hop hierarchy path."""

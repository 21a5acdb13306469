"""Lightning callbacks: attention pictures, VOS results, checkpoints."""

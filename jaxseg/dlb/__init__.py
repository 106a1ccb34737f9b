"""DeepLesionBrain (Kamraoui et al.) on the core: the compact U-Net, the tile grid with mirror pairing,
the vmapped tile-network ensemble, hierarchical specialisation, fusion and the ablation. The core
imports nothing from here."""

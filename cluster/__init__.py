"""How the project runs on real clusters: launcher configs, KubeRay manifests and what renders them."""

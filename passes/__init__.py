"""FX passes over the Dynamo graph: token-axis analysis, layer discovery, the saliency rewrite."""

"""Logical axis names carried by every parameter, cache and activation.

Sharding rules (config -> mesh axes) map these names to mesh axes; models never name a mesh axis.
Parameters and activations use distinct names so that, e.g., a parameter's `embed` dimension can be
sharded over `fsdp` while an activation's embedding dimension stays whole.
"""

# Parameters.
VOCAB = 'vocab'
EMBED = 'embed'
MLP = 'mlp'
HEADS = 'heads'
KV_HEADS = 'kv_heads'
HEAD_DIM = 'head_dim'
NORM = 'norm'
LAYERS = 'layers'  # The stacked (scanned) layer axis.
VISION_EMBED = 'vision_embed'
VISION_MLP = 'vision_mlp'
VISION_HEADS = 'vision_heads'
VISION_POSITIONS = 'vision_positions'

# Activations.
BATCH = 'activation_batch'
LENGTH = 'activation_length'
ACT_EMBED = 'activation_embed'
ACT_HEADS = 'activation_heads'
ACT_KV_HEADS = 'activation_kv_heads'
ACT_MLP = 'activation_mlp'
ACT_VOCAB = 'activation_vocab'

# KV cache: [layers, batch, sequence, kv_heads, head_dim].
CACHE_LAYERS = 'cache_layers'
CACHE_BATCH = 'cache_batch'
CACHE_SEQUENCE = 'cache_sequence'
CACHE_KV_HEADS = 'cache_kv_heads'
CACHE_HEAD_DIM = 'cache_head_dim'

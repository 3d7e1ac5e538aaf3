"""`moemesh train`: the recipe that trains the shipped default model (a small Mixtral-layout MoE on
Shakespeare's plays, byte-level), its corpus and its Hugging Face export."""

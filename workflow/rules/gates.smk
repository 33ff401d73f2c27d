# Router matrices, one [experts, hidden] per layer, computed from the base model.


rule gates:
    input:
        plan="results/{merge}/plan.json",
        base_weights=lambda wc: f"resources/models/{base_slug(wc)}/weights.json",
    output:
        tensors="results/{merge}/gates.safetensors",
        stats="results/{merge}/gates.json",
    log:
        "logs/{merge}/gates.log",
    resources:
        mem_mb=layer_mem_mb,
        runtime=120,
    conda:
        "../../envs/moeforge.yaml"
    script:
        "../scripts/gates.py"

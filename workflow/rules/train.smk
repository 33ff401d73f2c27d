# Router training (recipes with router_training:): the routers fitted on the experts' train_texts, starting
# from the gates, every other weight frozen. It reads the merge's own layer and globals shards (the MoE but its
# routers), so no source model is read twice; the routers shard then reads routers/trained.safetensors.


rule train_routers:
    input:
        plan="results/{merge}/plan.json",
        tensors="results/{merge}/plan.tensors.tsv",
        gates=lambda wc: gates_of(wc.merge, ".safetensors"),
        shards=shards_but_routers,
        config="results/{merge}/config/config.json",
        # The base model's tokenizer: the texts are read as the model reads them.
        base_meta=lambda wc: f"resources/models/{base_slug(wc)}/meta",
        texts=train_texts,
    output:
        tensors="results/{merge}/routers/trained.safetensors",
        report="results/{merge}/routers/report.json",
        markdown="results/{merge}/routers/report.md",
        figure="results/{merge}/routers/training.png",
    log:
        "logs/{merge}/train_routers.log",
    benchmark:
        "results/{merge}/benchmarks/train_routers.tsv"
    priority: 1
    threads: train_threads
    resources:
        mem_mb=train_mem_mb,
        runtime=240,
        gpu=lambda wc: int(RECIPES[wc.merge].router_training.device == "cuda"),
    script:
        "../scripts/train_routers.py"

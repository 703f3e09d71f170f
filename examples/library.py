"""retino as a library: find a dataset, read its balance, train briefly on the demo data."""

from retinocli.config import TrainConfig
from retinocli.data.layouts import load_dataset
from retinocli.data.stats import dataset_stats
from retinocli.data.synth import generate
from retinocli.engine.trainer import train

generate("demo-lib/data", n=200, size=64, force=True)
stats = dataset_stats(load_dataset("demo-lib/data"), sample=50)
print("bar to clear:", stats["splits"]["train"]["majority_accuracy"])
result = train(TrainConfig(data="demo-lib/data", img_size=48, epochs=3, batch_size=16, project="demo-lib/runs"))
print(result.run_dir, result.best_metrics)

"""Fine-tune an ImageNet backbone on a folder of labelled images (`python -m retrain`)."""

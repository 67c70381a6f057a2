"""Training: fine-tune resnet18 with fastai, and the article's SGD lessons."""

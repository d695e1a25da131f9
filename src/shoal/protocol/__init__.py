"""Request and response models, one module per API family. No logic, no engine imports."""

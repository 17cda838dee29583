"""The bottom floor: what every other part may import and which imports nothing of the project but the model
description: the errors a command ends with, the value types passed between layers (`layout`), the registry of
names and abilities (`registry`), and the console's manners (`console`). Nothing here imports torch."""

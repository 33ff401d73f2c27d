"""From recipe and metadata to the plan: recipe model, architecture templates, validation, the tensor table."""

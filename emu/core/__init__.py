"""The operator's rules and numerics, with no communication: attributes, input bundles,
checks shared by every chip, placement, send plan, receive layout, exact arithmetic."""

"""mmfm."""

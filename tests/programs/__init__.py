"""Small programs the subprocess tests run, and the helper that drives them."""

"""One module per protocol spoken over HTTP; ``base`` says what a protocol must provide."""

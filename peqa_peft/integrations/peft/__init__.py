"""Registration of the PEQA and QFT methods with PEFT, and the patches PEFT needs for them."""

"""A script whose load phase (no deepspeed.initialize: the whole run) holds one known buffer
allocated in one known function, beside small allocations elsewhere: the allocation stacks at
the phase's peak must name that function and line with that size."""

KNOWN_MIB = 64


def load_known_buffer() -> bytearray:
    return bytearray(KNOWN_MIB * 2**20)  # the line the stacks must name


def small_things() -> list:
    return [bytes(1000) for _ in range(100)]


if __name__ == "__main__":
    kept = load_known_buffer()
    other = small_things()
    print("held", len(kept), len(other), flush=True)

// The tqkv command-line tool. All logic lives in src/cli so that tests can run it in-process.
#include <iostream>

#include "cli.hpp"

int main(int argc, char** argv) {
  return tqkv::cli::run(std::vector<std::string>(argv + 1, argv + argc), std::cout, std::cerr);
}

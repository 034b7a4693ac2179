// The one Catch2 main shared by every suite.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

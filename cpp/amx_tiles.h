// The AMX tile configuration every tile kernel (moe_amx.cpp, kquant_amx.cpp) loads with
// ldtilecfg: palette 1, a shape (rows x bytes per row) per tile register.
#pragma once

#include <cstdint>

#include "isa.h"

#if KTLAB_X86
#include <immintrin.h>
#endif

namespace ktlab {

struct alignas(64) TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

constexpr int kTileRows = 16;
constexpr int kTileBytes = 64;  // bytes per tile row (colsb) at most

// One tile shape per register: rows x colsb.
struct TileShape {
    int reg, rows, colsb;
};

template <int N>
void set_tiles(TileConfig* cfg, const TileShape (&shapes)[N]) {
    *cfg = TileConfig{};
    cfg->palette_id = 1;
    for (const TileShape& t : shapes) {
        cfg->rows[t.reg] = (uint8_t)t.rows;
        cfg->colsb[t.reg] = (uint16_t)t.colsb;
    }
}

#if KTLAB_X86
// ldtilecfg of `cfg`. The empty asm that reads cfg's address with a memory clobber makes the
// compiler keep the stores that fill it: gcc 12 does not see that ldtilecfg reads them, and
// once dropped them (a config of zeros, then SIGILL on the first tile load).
__attribute__((target("amx-tile"))) inline void load_tile_config(const TileConfig& cfg) {
    __asm__ volatile("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}
#endif

}  // namespace ktlab

// The mock profile across Node-API: parsing a normalised profile object
// (src/vfio/mock-profile.ts makes it) and describing the profile's fields,
// both driven by VFIO_MOCK_PROFILE_FIELDS (mock_device.h).
#pragma once

#include <napi.h>

#include "mock_device.h"

namespace vfio {

// Every field type-, range- and cross-checked (ERR_VFIO_PROFILE or
// ERR_VFIO_BAD_ARGUMENT, "mock profile: <field> ..."): the addon's own guard
// against raw callers, and the one place the limits are enforced.
MockProfile ParseMockProfile(const Napi::Object& o);

// { fields: [{ name, input, kind, required, default, min, max }], limits }
Napi::Object MockProfileSchema(Napi::Env env);

}  // namespace vfio

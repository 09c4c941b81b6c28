// Validates KEDA ScaledObjects against the ScaledObject CRD schema, as
// packaged in @kubernetes-models/keda (generated from KEDA's CRDs), and
// rejects fields the CRD does not define (the package's validators allow
// them; the API server would drop them). Run by scripts/deploy-check.sh:
//
//   node keda.mjs MODELS_DIR SCALEDOBJECTS.json
//
// MODELS_DIR holds node_modules/@kubernetes-models/keda.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const [modelsDir, file] = process.argv.slice(2);
const pkg = join(modelsDir, "node_modules/@kubernetes-models/keda/keda.sh/v1alpha1");
const { ScaledObject } = await import(pathToFileURL(join(pkg, "ScaledObject.js")).href);

const PREFIX = "IComGithubKedacoreKedaV2ApisKedaV1alpha1";

// The fields of KEDA type `name`, from its TypeScript declaration:
// field → the KEDA type to descend into, or null for other types.
const declared = new Map();
function fields(name) {
  if (declared.has(name)) return declared.get(name);
  const dts = readFileSync(join(pkg, `${name}.d.ts`), "utf8");
  const body = dts.match(new RegExp(`export interface I${name} \\{\\n([\\s\\S]*?)\\n\\}`));
  if (!body) throw new Error(`no interface I${name} in ${name}.d.ts`);
  const out = new Map();
  for (const m of body[1].matchAll(/^    "([^"]+)"\??: (.*?);?$/gm)) {
    const kedaType = m[2].match(new RegExp(`^(?:Array<)?${PREFIX}(\\w+?)>?$`));
    out.set(m[1], kedaType ? kedaType[1] : null);
  }
  declared.set(name, out);
  return out;
}

function unknownFields(value, type, path, out) {
  if (value === null || typeof value !== "object") return;
  if (Array.isArray(value)) {
    value.forEach((v, i) => unknownFields(v, type, `${path}[${i}]`, out));
    return;
  }
  const known = fields(type);
  for (const [k, v] of Object.entries(value)) {
    if (!known.has(k)) out.push(`${path}.${k} is not a field of ${type}`);
    else if (known.get(k)) unknownFields(v, known.get(k), `${path}.${k}`, out);
  }
}

let bad = 0;
for (const so of JSON.parse(readFileSync(file, "utf8"))) {
  const name = so.metadata?.name;
  const errors = [];
  try {
    new ScaledObject(so).validate();
  } catch (e) {
    errors.push(e.message);
  }
  unknownFields(so.spec, "ScaledObjectSpec", "spec", errors);
  for (const e of errors) console.error(`deploy-check: ScaledObject ${name}: ${e}`);
  bad += errors.length;
}
process.exit(bad ? 1 : 0);

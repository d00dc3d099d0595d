package simulator

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"
)

// maxScenario bounds a scenario file.
const maxScenario = 1 << 20

// ScenarioArgs reads a YAML scenario file whose keys are `simulator run`
// flags (devices, rate, fault, slo...; '_' may stand for '-') and returns
// them as --key=value arguments, in the file's order. A list repeats its
// flag (fault: [churn:10%, gateway-restart@30s]). Values are checked by the
// flags themselves.
func ScenarioArgs(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxScenario+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxScenario {
		return nil, fmt.Errorf("%s: over %d bytes; a scenario is a short list of settings", path, maxScenario)
	}
	var doc yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("%s: empty scenario", path)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(doc.Content) != 1 || doc.Content[0].Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s: a scenario is a mapping of flag names to values, such as \"devices: 200\"", path)
	}
	m := doc.Content[0]
	var out []string
	var seen []string
	for i := 0; i+1 < len(m.Content); i += 2 {
		k, v := m.Content[i], m.Content[i+1]
		name := strings.ReplaceAll(k.Value, "_", "-")
		if k.Kind != yaml.ScalarNode || name == "" || name == "scenario" {
			return nil, fmt.Errorf("%s line %d: %q is not a flag name", path, k.Line, k.Value)
		}
		if slices.Contains(seen, name) {
			return nil, fmt.Errorf("%s line %d: %q given twice", path, k.Line, name)
		}
		seen = append(seen, name)
		switch v.Kind {
		case yaml.ScalarNode:
			out = append(out, "--"+name+"="+v.Value)
		case yaml.SequenceNode:
			for _, item := range v.Content {
				if item.Kind != yaml.ScalarNode {
					return nil, fmt.Errorf("%s line %d: %s: a list of plain values", path, item.Line, name)
				}
				out = append(out, "--"+name+"="+item.Value)
			}
		default:
			return nil, fmt.Errorf("%s line %d: %s: a value or a list of values", path, v.Line, name)
		}
	}
	return out, nil
}

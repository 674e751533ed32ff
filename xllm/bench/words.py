"""A fixed local word list for synthetic prompts (no dataset download).

Each word is a common lowercase English word that is a single token, with its leading space, in the
SmolLM2 (GPT-2 style BPE) tokenizer, and almost always in Llama / Qwen tokenizers too. So a prompt of N
words separated by spaces is approximately N tokens; the server's `usage.prompt_tokens` gives the exact
count, and that is what the results report.
"""

_TEXT = """
    the of and to in is was for on that with as by at from his it an were are which this be has had or
    also not first new one their after its who but two have her they other been she time all during into
    more only years year there school city some most over three between made may when up out world would
    later about season team under him then film known states where used while many part national well
    can such both these state war through people being before around since series music called home
    played life government number family began including each game work four song against area name back
    did our early high group album will station however second until club river like system country best
    five main use along following won several university general public last any population found old
    them company end just power long could league held those way same without local because great named
    village town take own south north east west book place record few left john band based lead small
    make down right order de large development different children history field water side party former
    come top character among service six although major form again given see short still head men case
    play took death even line within house army police role another white king land light us further day
    went art came become age now point period black often control student law thought air much very said
    what how get know go look want give find tell ask seem feel try leave call good little big next
    young important bad able person thing man hand child eye woman week problem fact do say think money
    story night room mother word business issue kind friend father hour member car community president
    minute idea kid body information parent face others level office door health result change morning
    reason research girl guy moment teacher force education red blue green yellow brown orange purple
    gray gold silver dog cat bird fish horse cow pig sheep lion tiger bear wolf fox rabbit mouse snake
    frog duck apple bread cheese milk rice meat egg salt sugar tea coffee wine beer soup cake fruit lake
    sea ocean mountain hill forest tree flower grass rock stone sand sky sun moon star cloud rain snow
    wind fire table chair bed window wall floor roof box bag cup glass plate knife fork spoon key lamp
    clock phone paper pen run walk jump swim fly read write sing dance cook eat drink sleep wake open
    close build break cut push pull carry hold happy sad angry quiet loud fast slow hot cold warm cool
    dry wet soft hard clean dirty rich poor strong weak
"""

WORDS: tuple[str, ...] = tuple(_TEXT.split())
